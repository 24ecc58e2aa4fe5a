"""Domain logic of agentmesh, no gRPC imports: built by server/domain.py, served by
server/main.py."""
