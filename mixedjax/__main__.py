"""``python -m mixedjax``: the ``mixedjax`` command line (:mod:`mixedjax.cli`).

Without arguments it runs the seed example: a random-intercept model fitted to the bundled
dietox data (pig weights over time), printing the summary::

    import mixedjax
    data = mixedjax.datasets.load("dietox")
    md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"])
    mdf = md.fit()
    print(mdf.summary())

With arguments it is the command line: ``python -m mixedjax fit sleepstudy "Reaction ~ Days +
(Days | Subject)" --output json``, ``python -m mixedjax datasets`` (``--help`` lists the options).
"""

from .cli import demo, main

__all__ = ["demo", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
