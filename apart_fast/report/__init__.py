"""Tables and figures: what ``experiments``, ``reproduce`` and ``bench cost`` measured, as markdown and PNG files.

``text.py`` (number cells, standard errors, markdown tables, the device in words) and ``figures.py`` (matplotlib
figures with a footer) are the pieces every report shares; ``evaluation.py``, ``comparison.py`` and ``cost.py`` are
the reports of ``eval`` and ``demo``, ``reproduce`` and ``bench cost``. Nothing here measures or imports the engine.
"""
