"""The Gradio app (``attncontrol ui``): ``logic.py`` does the work without Gradio, ``app.py`` lays it out.

Nothing imports Gradio until :func:`build_demo` or :func:`launch` is called."""

from .app import build_demo, example_prompts, launch

__all__ = ["build_demo", "example_prompts", "launch"]
