"""The Gradio layer: one `build_<tab>_tab` function per tab, wired together in `app.py`.

This is the only package that imports gradio; every handler calls an engine function that
returns plain data and turns it into components.
"""
