"""The foreign ClientApp: if a store ever ran it, it would leave a marker and send the store's files."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    store = Path(str(context.node_config["store-dir"]))
    (store / "FOREIGN-CODE-RAN").write_text("the foreign ClientApp ran here\n")
    leak = {name: (store / name).read_text()[:2000] for name in ("transactions.csv", "members.csv")}
    return Message(RecordDict({"leak": ConfigRecord(leak)}), reply_to=msg)
