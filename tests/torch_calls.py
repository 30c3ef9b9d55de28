"""``TorchCalls``: the torch functions and tensor methods called inside a ``with`` block, by name (attribute access
left out). The offload tests count the calls a worker-thread task makes: each one hands the GIL back and waits to
take it again while another thread runs Python.

    with TorchCalls() as c:
        torch.ones(2).add_(1)
    c.calls   # ['ones', 'add_']
"""

from torch.overrides import TorchFunctionMode


class TorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in ("__get__", "__set__"):   # attribute access (p.grad = None) holds the GIL
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
