"""LoRA Studio engine: data, PII, hardware, training, chat and export, with no UI toolkit.

Only `studio.ui` imports gradio; everything else works headless and returns plain data.
"""

__version__ = "0.1.0"
