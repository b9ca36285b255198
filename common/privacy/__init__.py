"""The privacy room: the accountant (ε from a mechanism history), ledger events, key files."""
