"""idlemesh wire protocol. Pure: no I/O, no clock, no randomness; time, keys and seeds are arguments."""
