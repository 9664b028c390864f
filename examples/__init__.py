"""Examples of nlx: a folder of the checkout, not part of the installed package.

Run from the repository root (``pip install -e .`` first):

* ``python -m examples.demo``: a tiny model of ``nlx.nn`` parts, whose sequence mixer is one of
  the ops of ``nlx.ops``, learns multi-query associative recall, trained with ``nlx.train.fit``.

``nlx`` never imports this folder.
"""
