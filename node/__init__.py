"""idlemesh node: every piece of I/O (network, disk, processes, sensors) lives here."""
