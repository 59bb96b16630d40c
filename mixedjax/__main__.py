"""Run the seed example: ``python -m mixedjax``.

Fits a random-intercept model to the bundled dietox data (pig weights over time)
and prints the summary::

    import mixedjax
    data = mixedjax.datasets.load("dietox")
    md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"])
    mdf = md.fit()
    print(mdf.summary())
"""

import mixedjax


def main() -> None:
    data = mixedjax.datasets.load("dietox")
    md = mixedjax.mixedlm("Weight ~ Time", data, groups=data["Pig"])
    mdf = md.fit()
    print(mdf.summary())


if __name__ == "__main__":
    main()
