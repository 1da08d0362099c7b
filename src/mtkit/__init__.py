"""mtkit: the Transformer of "Attention Is All You Need" as a command-line translation toolkit.

Python API: `Translator.load(path).translate(lines)`; the rest lives behind the `mtkit` command.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Translator":  # lazy, so `import mtkit` stays free of torch
        from mtkit.translate import Translator

        return Translator
    raise AttributeError(name)
