"""The exchange room: what crosses the wire between a store and the server, how updates are encoded, and the server's checks on them."""
