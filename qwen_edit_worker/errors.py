"""The error a client's input causes: its message is the one sentence the client sees.

The lowest module of the package: the job side, the LoRA files and the engine all raise it,
and none of them needs the job schema to do so.
"""


class InputError(ValueError):
    """The job input is not acceptable; the message is the sentence the client sees."""
