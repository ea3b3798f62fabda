// Scalar float64 special functions for the negative binomial kernels' general path: entries
// whose count is large (beyond the per-gene tables) or not an integer. Compiled once, for the
// baseline ISA; these run on a small fraction of the entries.
#pragma once

namespace samsvae {
namespace cpu {

// T(x, theta) = D(x, theta) - lgamma(x + 1), D(x, theta) = lgamma(x + theta) - lgamma(theta)
// - x log(theta); x >= 0, theta > 0, log_theta = log(theta). Float64 accuracy for theta in
// [1e-4, 1e6] and x up to 1e7 (theta >= 10 uses Stirling's series in log1p form).
double nb_count_term(double x, double theta, double log_theta);

// d D(x, theta) / d log(theta) = theta (digamma(x + theta) - digamma(theta)) - x.
double nb_count_term_dlogtheta(double x, double theta);

// lgamma(z) and digamma(z) for z > 0 (shift to z >= 10, then asymptotic series).
double lgamma_positive(double z);
double digamma_positive(double z);

}  // namespace cpu
}  // namespace samsvae
