"""The rounding constants of the search engine (cloud/search.py) and of its codes scan
(cloud/codes.py), defined once: both bound the same scores, so they must agree.

SAFETY_EPS: a vector is pruned only when its bound is below the threshold by more than
SAFETY_EPS |row| |token|, two orders of magnitude above the float64 rounding error of a
secure-kNN score (about 1e-12 |row| |token|: the matrices' condition number is at most 4).
The codes' per-row slack includes the same margin, so a row the codes let through is
one the engine would not have pruned. A larger margin costs pruning, never exactness.
"""

SAFETY_EPS = 1e-10
FLOAT32_UNIT = 2.0**-24  # unit roundoff of float32
FLOAT64_UNIT = 2.0**-53  # unit roundoff of float64
