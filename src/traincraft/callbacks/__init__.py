"""Callbacks for ``Trainer(callbacks=[...])``: one public callback per file."""

__all__: list[str] = []
