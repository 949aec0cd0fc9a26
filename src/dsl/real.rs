//! The number types a user mod's host implementation runs on: `f64` (the oracle), `f32` (the
//! CPU backend and the tolerance rule's yardstick) and [`Dual`] (forward-mode derivatives).

use std::ops::{Add, Div, Mul, Neg, Rem, Sub};

/// What the host code generated from a `#[score_mod]` needs of its number type. Implemented for
/// `f32`, `f64` and [`Dual`]; comparisons compare values (a dual number's tangent is ignored).
pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Rem<Output = Self>
    + Neg<Output = Self>
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// A constant (a literal of the user's function), rounded to this type.
    fn constant(x: f64) -> Self;
    /// A captured `f32` (an `Aux<f32>` element or an `f32` parameter), exactly.
    fn from_f32(x: f32) -> Self;
    /// An integer expression cast with `as f32`.
    fn from_int(x: i64) -> Self;
    /// Truncation toward zero (`as i32` in the user's function).
    fn to_int(self) -> i64;
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn floor(self) -> Self;
    /// The smaller value (the first on ties).
    fn min(self, other: Self) -> Self {
        if other < self { other } else { self }
    }
    /// The larger value (the first on ties).
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
}

macro_rules! real_float {
    ($t:ty) => {
        impl Real for $t {
            fn constant(x: f64) -> Self {
                x as $t
            }
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn from_int(x: i64) -> Self {
                x as $t
            }
            fn to_int(self) -> i64 {
                self as i64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
        }
    };
}
real_float!(f32);
real_float!(f64);

/// A dual number `v + d·ε` (`ε² = 0`): evaluating a function on `Dual::variable(x)` gives
/// `f(x)` and `f'(x)` at once — forward-mode differentiation over the function's expression
/// tree, exact up to `f64` rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dual {
    /// The value.
    pub v: f64,
    /// The derivative with respect to the variable.
    pub d: f64,
}

impl Dual {
    /// The variable itself: `x + 1·ε`.
    pub fn variable(x: f64) -> Dual {
        Dual { v: x, d: 1.0 }
    }

    fn constant_of(x: f64) -> Dual {
        Dual { v: x, d: 0.0 }
    }
}

/// `t · factor`, with a zero tangent staying zero: a sub-expression that does not depend on
/// the variable has derivative 0 even where its local derivative is infinite or undefined
/// (`sqrt(|d|)` at `d = 0` for a constant `d`), where `0 · ∞` would be NaN.
fn chain(t: f64, factor: f64) -> f64 {
    if t == 0.0 { 0.0 } else { t * factor }
}

impl PartialOrd for Dual {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.v.partial_cmp(&other.v)
    }
}

impl Add for Dual {
    type Output = Dual;
    fn add(self, o: Dual) -> Dual {
        Dual {
            v: self.v + o.v,
            d: self.d + o.d,
        }
    }
}

impl Sub for Dual {
    type Output = Dual;
    fn sub(self, o: Dual) -> Dual {
        Dual {
            v: self.v - o.v,
            d: self.d - o.d,
        }
    }
}

impl Mul for Dual {
    type Output = Dual;
    fn mul(self, o: Dual) -> Dual {
        Dual {
            v: self.v * o.v,
            d: chain(self.d, o.v) + chain(o.d, self.v),
        }
    }
}

impl Div for Dual {
    type Output = Dual;
    fn div(self, o: Dual) -> Dual {
        Dual {
            v: self.v / o.v,
            d: chain(self.d, 1.0 / o.v) - chain(o.d, self.v / (o.v * o.v)),
        }
    }
}

impl Rem for Dual {
    type Output = Dual;
    /// `a % b = a − trunc(a / b)·b`: derivative `a' − trunc(a / b)·b'` (the quotient is
    /// locally constant).
    fn rem(self, o: Dual) -> Dual {
        let q = (self.v / o.v).trunc();
        Dual {
            v: self.v % o.v,
            d: self.d - chain(o.d, q),
        }
    }
}

impl Neg for Dual {
    type Output = Dual;
    fn neg(self) -> Dual {
        Dual {
            v: -self.v,
            d: -self.d,
        }
    }
}

impl Real for Dual {
    fn constant(x: f64) -> Self {
        Dual::constant_of(x)
    }
    fn from_f32(x: f32) -> Self {
        Dual::constant_of(f64::from(x))
    }
    fn from_int(x: i64) -> Self {
        Dual::constant_of(x as f64)
    }
    fn to_int(self) -> i64 {
        self.v as i64
    }
    fn exp(self) -> Self {
        let e = self.v.exp();
        Dual {
            v: e,
            d: self.d * e,
        }
    }
    fn ln(self) -> Self {
        Dual {
            v: self.v.ln(),
            d: chain(self.d, 1.0 / self.v),
        }
    }
    fn tanh(self) -> Self {
        let t = self.v.tanh();
        Dual {
            v: t,
            d: chain(self.d, 1.0 - t * t),
        }
    }
    fn sqrt(self) -> Self {
        let r = self.v.sqrt();
        Dual {
            v: r,
            d: chain(self.d, 0.5 / r),
        }
    }
    fn abs(self) -> Self {
        if self.v < 0.0 { -self } else { self }
    }
    fn floor(self) -> Self {
        Dual::constant_of(self.v.floor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derivative(f: impl Fn(Dual) -> Dual, x: f64) -> f64 {
        f(Dual::variable(x)).d
    }

    #[test]
    fn dual_rules_match_the_calculus() {
        let x = 0.7;
        assert!((derivative(|x| x * x * x, x) - 3.0 * x * x).abs() < 1e-15);
        assert!((derivative(Real::exp, x) - x.exp()).abs() < 1e-15);
        assert!((derivative(Real::ln, x) - 1.0 / x).abs() < 1e-15);
        assert!((derivative(Real::tanh, x) - (1.0 - x.tanh().powi(2))).abs() < 1e-15);
        assert!((derivative(Real::sqrt, x) - 0.5 / x.sqrt()).abs() < 1e-15);
        assert!((derivative(|x| Dual::constant(2.0) / x, x) + 2.0 / (x * x)).abs() < 1e-14);
        assert_eq!(derivative(|x| -x.abs(), -x), 1.0);
        assert_eq!(derivative(|x| x.min(Dual::constant(0.5)), x), 0.0);
        assert_eq!(derivative(|x| x.max(Dual::constant(0.5)), x), 1.0);
        assert_eq!(derivative(|x| x % Dual::constant(0.5), x), 1.0);
        // A constant's derivative is 0 even where the function's slope is not finite.
        assert_eq!(derivative(|x| x + Dual::constant(0.0).sqrt(), x), 1.0);
        assert_eq!(
            derivative(|x| x * Dual::constant(0.0).ln(), x),
            f64::NEG_INFINITY
        );
    }
}
