"""Datasets: the example record, readers for common math formats, and the demo generator."""

from reftkit.data.records import Example

__all__ = ["Example"]
