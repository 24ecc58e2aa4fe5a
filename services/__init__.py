"""Domain logic of agentmesh: no gRPC imports; wired together by server/main.py."""
