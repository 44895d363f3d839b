"""Local multi-process idlemesh networks on 127.0.0.1."""
