"""Sans-IO HTTP/1.1: head parsing, body framing, header rules. No sockets, no reactor."""
