"""idlemesh for applications: a warm buyer client.

    import idlemesh
    async with idlemesh.Client(home, [bootstrap_addr]) as client:   # trio
        answer = await client.infer("model.onnx", {"x": array}, deadline_ms=200)
    with idlemesh.SyncClient(home, [bootstrap_addr]) as client:      # threads
        answer = client.infer("model.onnx", {"x": array})

`answer.outputs` holds the arrays; `answer.receipt` the provider's signed receipt, which
this buyer has verified, recorded and countersigned.
"""

from node.client import Client, ClientError, Inference, InputError, Model, SyncClient

__all__ = ["Client", "ClientError", "Inference", "InputError", "Model", "SyncClient"]
