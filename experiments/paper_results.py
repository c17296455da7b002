"""The paper's published test errors (%), transcribed from the spec (§5) for `reproduce.py`.

`ERRORS[table][row][setting]`: a row lists only the settings the paper reports for it. Rows are
in the paper's order; only FractalNet rows are here (the baselines are other papers' results).
Table 2 is ImageNet (10-crop); Tables 3 and 4 are the ultra-deep study on CIFAR-100++.
"""

ERRORS: dict[int, dict[str, dict[str, float]]] = {
    1: {
        "FractalNet-20": {"C100": 35.34, "C100+": 23.30, "C100++": 22.85, "C10": 10.18,
                          "C10+": 5.22, "C10++": 5.11, "SVHN": 2.01},
        "+ drop-path + dropout": {"C100": 28.20, "C100+": 23.73, "C100++": 23.36, "C10": 7.33,
                                  "C10+": 4.60, "C10++": 4.59, "SVHN": 1.87},
        "→ deepest column alone": {"C100": 29.05, "C100+": 24.32, "C100++": 23.60, "C10": 7.27,
                                   "C10+": 4.68, "C10++": 4.63, "SVHN": 1.89},
        "FractalNet-40": {"C100+": 22.49, "C100++": 21.49, "C10+": 5.24, "C10++": 5.21},
    },
    2: {
        "FractalNet-34, top-1": {"ImageNet": 24.12},
        "FractalNet-34, top-5": {"ImageNet": 7.39},
    },
    3: {
        "FractalNet C=1 (5 layers)": {"C100++": 37.32},
        "FractalNet C=2 (10 layers)": {"C100++": 30.71},
        "FractalNet C=3 (20 layers)": {"C100++": 27.69},
        "FractalNet C=4 (40 layers)": {"C100++": 27.38},
        "FractalNet C=5 (80 layers)": {"C100++": 26.46},
        "FractalNet C=6 (160 layers)": {"C100++": 27.38},
    },
    4: {
        "plain, 5 layers": {"C100++": 36.62},
        "plain, 10 layers": {"C100++": 32.47},
        "plain, 20 layers": {"C100++": 31.31},
        "plain, 40 layers": {"C100++": 38.84},
        "fractal column 1 alone (5 layers)": {"C100++": 37.23},
        "fractal column 2 alone (10 layers)": {"C100++": 32.85},
        "fractal column 3 alone (20 layers)": {"C100++": 31.31},
        "fractal column 4 alone (40 layers)": {"C100++": 31.75},
        "full 4-column fractal (40 layers)": {"C100++": 27.40},
    },
}
