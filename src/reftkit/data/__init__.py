"""Datasets: the example record, readers for common math formats, and the demo generator."""

from reftkit.data.readers import DataError, LoadResult, Skipped, load_examples
from reftkit.data.records import Example

__all__ = ["DataError", "Example", "LoadResult", "Skipped", "load_examples"]
