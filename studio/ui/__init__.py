"""The Gradio layer: one module per tab (the Chat tab is the `chat` package), assembled in `app.py`.

Each tab has the same split: `build_<tab>_tab(ctx)` returns its components by name and
`wire_<tab>_tab(ctx, components)` attaches the events. This is the only package that imports
gradio; every handler calls an engine function that returns plain data and turns it into
components.
"""
