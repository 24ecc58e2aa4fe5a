"""Thin gRPC servicers: proto → domain arguments, await the domain service, domain → proto."""
