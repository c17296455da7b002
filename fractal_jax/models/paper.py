"""The paper's architecture constants (spec §1-§2), free of JAX so that config files can use them."""

CIFAR_WIDTHS = (64, 128, 256, 512, 512)  # FractalNet-20 (Table 1)
ULTRA_WIDTHS = (16, 32, 64, 128, 128)  # the ultra-deep study (Tables 3-4)
CIFAR_DROPOUT = (0.0, 0.1, 0.2, 0.3, 0.4)  # per block [P §4.1]
