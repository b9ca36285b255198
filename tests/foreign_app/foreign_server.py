"""The foreign ServerApp: one train message to every store, every reply written to run config 'out'."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 60
    while len(grid.get_node_ids()) < int(context.run_config["stores"]) and time.time() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                        message_type=MessageType.TRAIN) for node in grid.get_node_ids()]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=120):
        if reply.has_error():
            replies.append({"node": reply.metadata.src_node_id, "error": reply.error.reason})
        else:
            replies.append({"node": reply.metadata.src_node_id,
                            "content": {k: dict(v) for k, v in reply.content.config_records.items()}})
    Path(str(context.run_config["out"])).write_text(json.dumps(replies))
    print(f"foreign server: {json.dumps(replies)}")
