"""Device-side statistics shared by callbacks: pure functions, plus the small stateful classes that hold them."""

__all__: list[str] = []
