#include "nb/nb_special.h"

#include <cmath>

namespace samsvae {
namespace cpu {
namespace {

constexpr double kHalfLog2Pi = 0.91893853320467274178;
constexpr double kShiftTo = 10.0;

// Stirling correction c(z) = lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2], z >= 10:
// Bernoulli series to z^-13 (next term < 1e-16 relative at z = 10).
double stirling_correction(double z) {
  const double r = 1.0 / z, r2 = r * r;
  return r * (1.0 / 12.0 + r2 * (-1.0 / 360.0 + r2 * (1.0 / 1260.0 + r2 * (-1.0 / 1680.0
         + r2 * (1.0 / 1188.0 + r2 * (-691.0 / 360360.0 + r2 * (1.0 / 156.0)))))));
}

// c'(z)
double stirling_correction_deriv(double z) {
  const double r = 1.0 / z, r2 = r * r;
  return -r2 * (1.0 / 12.0 + r2 * (-3.0 / 360.0 + r2 * (5.0 / 1260.0 + r2 * (-7.0 / 1680.0
         + r2 * (9.0 / 1188.0 + r2 * (-11.0 * 691.0 / 360360.0 + r2 * (13.0 / 156.0)))))));
}

// log1p(r) - r without cancellation for small r
double log1pmx(double r) {
  if (std::fabs(r) < 1e-2) {
    // -r^2/2 + r^3/3 - ... ; 10 terms reach 1e-17 relative for |r| < 0.01
    double s = 0.0, p = r * r;
    for (int k = 2; k <= 11; ++k) {
      s += ((k % 2 == 0) ? -p : p) / k;
      p *= r;
    }
    return s;
  }
  return std::log1p(r) - r;
}

}  // namespace

double lgamma_positive(double z) {
  double shift = 0.0;
  if (z < kShiftTo) {
    double prod = 1.0;
    while (z < kShiftTo) {
      prod *= z;
      z += 1.0;
    }
    shift = std::log(prod);
  }
  return (z - 0.5) * std::log(z) - z + kHalfLog2Pi + stirling_correction(z) - shift;
}

double digamma_positive(double z) {
  double shift = 0.0;
  while (z < kShiftTo) {
    shift += 1.0 / z;
    z += 1.0;
  }
  const double r = 1.0 / z, r2 = r * r;
  const double series = r2 * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 * (1.0 / 252.0
                        - r2 * (1.0 / 240.0 - r2 * (1.0 / 132.0 - r2 * (691.0 / 32760.0
                        - r2 * (1.0 / 12.0)))))));
  return std::log(z) - 0.5 * r - series - shift;
}

double nb_count_term(double x, double theta, double log_theta) {
  double d;
  if (theta >= kShiftTo) {
    d = (theta + x - 0.5) * std::log1p(x / theta) - x
        + stirling_correction(theta + x) - stirling_correction(theta);
  } else {
    d = lgamma_positive(x + theta) - lgamma_positive(theta) - x * log_theta;
  }
  return d - lgamma_positive(x + 1.0);
}

double nb_count_term_dlogtheta(double x, double theta) {
  if (theta >= kShiftTo) {
    // theta log1p(x/theta) - x (theta + x - 1/2) / (theta + x) + theta (c'(theta + x) - c'(theta))
    return theta * log1pmx(x / theta) + 0.5 * x / (theta + x)
           + theta * (stirling_correction_deriv(theta + x) - stirling_correction_deriv(theta));
  }
  return theta * (digamma_positive(x + theta) - digamma_positive(theta)) - x;
}

}  // namespace cpu
}  // namespace samsvae
