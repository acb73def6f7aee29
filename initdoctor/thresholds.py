"""Every number a rule compares against, in one place, each with where it comes from.

The bands were calibrated on healthy networks (5 seeds, widths 64-1024, depth <= 50); see
docs/theory.md and DESIGN section 4 for the measurements behind them.
"""

from __future__ import annotations

# --- depth trends (ID201-ID204) -------------------------------------------------------------
# Ratio of the last to the first member of a homologous group (q_last/q_first for the signal,
# G_first/G_last for gradients). Healthy He/ReLU at depth 10-50 gives 0.04-2.6, so [1e-2, 1e2]
# leaves a margin of 4x below and 40x above before a warning; [1e-4, 1e4] is an error.
TREND_WARN = 1e-2
TREND_ERROR = 1e-4
# Collapse r_last/r_first (share of the signal that still depends on the input). Healthy He at
# depth 30 reaches 0.05; same bands.
COLLAPSE_WARN = 1e-2
COLLAPSE_ERROR = 1e-4
# A trend needs this many comparable layers: two points are a pair, not a trend, and a single
# layer of a healthy width-64 net moves by 0.45-1.93.
MIN_GROUP = 3

# --- saturation (ID301) ---------------------------------------------------------------------
# s = share of outputs on the flat tails, u = share of units saturated on >= 99% of the batch.
# Healthy tanh with Xavier gain 5/3 reaches s = 0.11.
SAT_SHARE_WARN = 0.2
SAT_SHARE_ERROR = 0.5
SAT_UNITS_WARN = 0.05
SAT_UNITS_ERROR = 0.2
SAT_UNIT_BATCH = 0.99  # a unit counts as saturated when this share of its samples is
SIGMOID_LO, SIGMOID_HI = 0.01, 0.99  # sigmoid outputs beyond these are on a tail
TANH_ABS = 0.99  # tanh-like |y| beyond this is on a tail

# --- linear regime (ID302) ------------------------------------------------------------------
# Median per-unit std of the nonlinearity's input. Below these the curve is within a few percent
# of its tangent line across the batch (sigmoid is twice as wide as tanh).
LINEAR_STD = {"sigmoid": 0.5, "tanh": 0.25, "hardtanh": 0.25, "softsign": 0.25}
LINEAR_LAYER_SHARE = 0.5  # ... in at least this share of that activation's layers

# --- dead units (ID303) ---------------------------------------------------------------------
# Healthy He at depth 30 reaches 30-45% in its worst layer.
DEAD_WARN = 0.5
DEAD_ERROR = 0.99
# A layer whose input-dependent share r is below this sees almost no variation across the batch
# (squeeze-excitation's pooled features: r 0.004-0.05 measured; healthy dense layers 0.6-0.8): each
# unit is then on or off for the whole batch by the sign of its mean, a coin flip under a
# sign-symmetric init. Its dead count counts only when chance (Binomial(units, 1/2)) would give it
# with probability below DEAD_CHANCE: 2-4 of 4 SE units gave P = 0.06-0.3; 127 of 128 units killed by
# a negative bias gives 4e-37.
POOLED_R = 0.05
DEAD_CHANCE = 1e-3

# --- symmetry (ID101-ID103) -----------------------------------------------------------------
# Rows within this fraction of the largest row norm are duplicates. float32 rounding of equal
# rows computed differently stays far below 1e-5; bfloat16 has 8 bits of mantissa.
DUP_TOL = {"default": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}

# --- plain depth (ID907) ---------------------------------------------------------------------
# He et al. (2015/2016): plain stacks of ~30 layers train slowly and unstably even when initialized
# correctly; examples/train_digits.py measures it (a 30-layer He ReLU MLP on digits, seeds 0-4: 0.10-0.79
# test accuracy at lr 0.02, median about 0.4; mostly about 0.9 at lr 0.005).
PLAIN_DEPTH = 30

# --- init scale (ID501) ---------------------------------------------------------------------
# Weight std against the variance-preserving std for its fan and activation. PyTorch's default
# is 1/sqrt(6) = 0.41 of He for ReLU, which is a sixth of the variance; anything outside
# [1/3, 3] in std (1/9-9 in variance) is worth a note.
SCALE_NOTE = 3.0
# A weight 10x the variance-preserving std multiplies the variance it receives by 100 in one layer:
# the depth-trend warning band (1e2) crossed by a single layer. Healthy inits sit within [1/3, 3];
# N(0, 1) weights in a 256-1024-wide MLP are 11-25x (a transformer's MLP so drawn: its residual
# stream's second moment jumps from 4e-4 to 2e7 in the first block, which no depth trend shows,
# since every block's input is normalized). Only the large side warns: small weights are the
# depth trends' business (they compound, one layer alone does not).
SCALE_WARN = 10.0

# A weight whose variance is within this factor of the prescribed one counts as "at the prescribed
# scale" (Xavier on a ReLU layer is half of He's variance: outside; sampling noise: far inside).
PRESCRIBED_VAR_TOL = 1.25

# Residual projections drawn at 1/sqrt(N) of their branch's input layers (GPT-2's c_proj at
# 0.02/sqrt(2 n_layer)): recognised when std^2 * N / (the branch inputs' std^2) is within this factor
# of 1 for every block. GPT-2 measures 0.99-1.01 (sampling noise); the nearest other convention,
# 1/sqrt(n_layer), is a factor 2 away, and so is an MLP's output projection under PyTorch's default
# (fan 4d against d), which is told apart by its fan anyway.
RESIDUAL_VAR_TOL = 1.25

# --- prescription (plan/apply) --------------------------------------------------------------
# tanh with gain 5/3 turns chaotic with depth (gradients grow 28x at 20 layers, 139x at 30).
TANH_DEEP = 20
TANH_DEEP_GAIN = 1.0
SIGMOID_GAIN = 4.0  # undoes sigmoid's slope of 1/4 at the origin
LSUV_ITERATIONS = 3  # bounded re-examinations after a fix
