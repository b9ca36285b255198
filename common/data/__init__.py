"""The data room: the data contract, validation and ingestion of store files, the generated chain, and examples built from a store's receipts."""
