"""Pre-quantized bases (`*-bnb-4bit`): export merges onto the 16-bit original, or refuses first.

The most downloaded QLoRA bases are stored in 4-bit already. They train and chat, but a merge
into them fails deep inside transformers ("You cannot cast a bitsandbytes model in a new
dtype"), after minutes of work; and a 4-bit merge would round the adapter away anyway. The
adapter was trained against the dequantized weights of the 16-bit original, so export merges
onto that original (what Unsloth's own save does), or says before any work what to do.

The model catalogue (`studio.models.catalog.original_of`) knows each 4-bit twin's original;
for an id it does not list, export refuses before any work and says what to do.
"""

from __future__ import annotations

from studio.export.common import ExportError, Progress
from studio.models import catalog
from studio.models import loader as models
from studio.runs import Run


def merge_base(
    src: Run, base: models.ResolvedModel, progress: Progress | None = None
) -> models.ResolvedModel:
    """The model the adapter is merged into: `base` itself when its weights are plain, its
    16-bit original when `base` is stored quantized. ExportError, before any work, when that
    original is unknown or cannot be fetched, saying what to do."""
    quant = catalog.quantization_of(base.path)
    if quant is None:
        return base
    kind = str(quant.get("quant_method") or "quantized")
    original = catalog.original_of(src.base_model)
    if original is None:
        raise ExportError(
            f"The base model of {src.name}, {src.base_model}, is stored {kind}-quantized, and a"
            " merge needs 16-bit weights; the studio does not know which model it was made"
            " from. Train on the 16-bit original (QLoRA quantizes it while loading), or use"
            " the adapter as it is (Chat, or Ollama's ADAPTER line)."
        )
    try:
        found = models.resolve_model(original, progress)
    except Exception as exc:
        raise ExportError(
            f"The base model of {src.name}, {src.base_model}, is stored {kind}-quantized, so"
            f" the adapter is merged into its 16-bit original {original}, which could not be"
            f" fetched: {exc}\nConnect to the internet once (or put {original} in a local"
            " folder and name it in the run's settings), then export again."
        ) from exc
    return models.ResolvedModel(original, found.path, found.source, found.revision)


def notes(src: Run, base: models.ResolvedModel) -> list[str]:
    """The line an export shows when `merge_base` went to the original."""
    if base.name == src.base_model:
        return []
    return [f"{src.base_model} is stored quantized: the adapter was merged into {base.name}"]
