//! `try_forward` on every backend with arbitrary shapes and strides: the oracle and the CPU
//! agree on whether the input is valid (the same typed error), and where it is, the CPU (and
//! the kernels, when a device is open) pass the tolerance rule against the oracle per row, and
//! rows that see nothing are 0 with LSE −∞. Views are contiguous, reversed (negative strides),
//! broadcast (zero strides) or padded.

use crate::Trace;
use arbitrary::{Result, Unstructured};
use gqa::backend::{Backend, HostOutput};
use gqa::oracle::{self, compare_lse, compare_rows};
use gqa::{AttentionSpec, DType, Element};
use half::{bf16, f16};
use ndarray::{Array4, ArrayView4, Axis, s};

use super::{data, mask};
use crate::Env;

/// The kernel configurations the fuzzer may launch: a few, so that a run compiles a few kernels
/// (each distinct one costs a JIT), with every runtime value still drawn.
const CUBE_CONFIGS: [(usize, usize, usize); 2] = [(4, 2, 8), (3, 1, 5)];

pub fn run(u: &mut Unstructured, t: &mut Trace, env: &Env) -> Result<()> {
    let (hq, hkv) = *u.choose(&[(1, 1), (2, 1), (4, 2), (4, 4), (6, 3), (8, 1), (3, 1)])?;
    let d = if u.arbitrary()? {
        *u.choose(&[5usize, 8])?
    } else {
        u.int_in_range(1..=20)?
    };
    let mut spec = AttentionSpec::try_new(hq, hkv, d)
        .expect("a valid configuration")
        .with_mask(mask(u)?);
    if u.ratio(1, 3)? {
        spec = spec
            .try_with_scale(f64::from(u.int_in_range(-64i32..=64)?) / 16.0)
            .unwrap();
    }
    if u.ratio(1, 4)? {
        spec = spec
            .try_with_softcap(f32::from(u.int_in_range(1u8..=60)?))
            .unwrap();
    }
    if u.ratio(1, 4)? {
        spec = spec.with_alibi();
    }
    let (batch, seq_q, seq_k) = (
        u.int_in_range(0..=2)?,
        u.int_in_range(0..=12)?,
        u.int_in_range(0..=12)?,
    );
    // Mostly the right shapes; sometimes one dimension of one tensor is off.
    let dims = |right: [usize; 4], u: &mut Unstructured| -> Result<[usize; 4]> {
        let mut dims = right;
        if u.ratio(1, 8)? {
            let axis = u.int_in_range(0..=3)?;
            dims[axis] = u.int_in_range(0..=6)?;
        }
        Ok(dims)
    };
    let q_dims = dims([batch, hq, seq_q, d], u)?;
    let k_dims = dims([batch, hkv, seq_k, d], u)?;
    let v_dims = if u.ratio(1, 10)? {
        dims(k_dims, u)?
    } else {
        k_dims
    };
    let gain = if u.ratio(1, 8)? { 50.0 } else { 1.0 };
    let (q, k, v) = (
        tensor(u, q_dims, gain)?,
        tensor(u, k_dims, 1.0)?,
        tensor(u, v_dims, 1.0)?,
    );
    let layouts = [Layout::draw(u)?, Layout::draw(u)?, Layout::draw(u)?];
    match u.int_in_range(0u8..=2)? {
        0 => check::<f32>(t, env, &spec, (&q, &k, &v), layouts),
        1 => check::<f16>(t, env, &spec, (&q, &k, &v), layouts),
        _ => check::<bf16>(t, env, &spec, (&q, &k, &v), layouts),
    }
    Ok(())
}

fn tensor(u: &mut Unstructured, dims: [usize; 4], gain: f64) -> Result<Array4<f64>> {
    let n = dims.iter().product::<usize>();
    let data = data(u, n, gain)?;
    Ok(Array4::from_shape_vec(dims, data).expect("n elements"))
}

/// How a tensor is laid out in memory: the view the backends get.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Contiguous,
    /// Every axis reversed: negative strides.
    Reversed,
    /// Inside a buffer twice as large on every axis, at odd indices (padding NaN).
    Padded,
    /// Broadcast along an axis of length 1 (a zero stride), when that axis has length 1.
    Broadcast(usize),
    /// Axes 2 and 3 swapped in memory (a transposed layout).
    Transposed,
}

impl Layout {
    fn draw(u: &mut Unstructured) -> Result<Layout> {
        Ok(match u.int_in_range(0u8..=5)? {
            0 | 1 => Layout::Contiguous,
            2 => Layout::Reversed,
            3 => Layout::Padded,
            4 => Layout::Broadcast(u.int_in_range(0..=3)?),
            _ => Layout::Transposed,
        })
    }
}

/// The memory behind a view of `x` laid out as `layout`; [`view_of`] gives the view.
struct Backing<T> {
    data: Array4<T>,
    layout: Layout,
    dims: [usize; 4],
}

fn backing<T: Element>(x: &Array4<f64>, layout: Layout) -> Backing<T> {
    let dims: [usize; 4] = x.shape().try_into().unwrap();
    let narrow = |a: &Array4<f64>| a.mapv(T::narrow);
    let data = match layout {
        Layout::Contiguous => narrow(x),
        Layout::Reversed => {
            let mut r = narrow(x);
            for axis in 0..4 {
                r.invert_axis(Axis(axis));
            }
            r.as_standard_layout().to_owned()
        }
        Layout::Padded => {
            let big = [
                2 * dims[0] + 1,
                2 * dims[1] + 1,
                2 * dims[2] + 1,
                2 * dims[3] + 1,
            ];
            let mut p = Array4::from_elem(big, T::narrow(f64::NAN));
            p.slice_mut(
                s![1..2 * dims[0]; 2, 1..2 * dims[1]; 2, 1..2 * dims[2]; 2, 1..2 * dims[3]; 2],
            )
            .assign(&narrow(x));
            p
        }
        // One slice along `axis`, seen `dims[axis]` times through a zero stride (all backends
        // see the same broadcast view, so it is the tensor they are given).
        Layout::Broadcast(axis) if dims[axis] > 0 => narrow(
            &x.slice_axis(Axis(axis), ndarray::Slice::from(0..1))
                .to_owned(),
        ),
        Layout::Broadcast(_) => narrow(x),
        Layout::Transposed => {
            let mut tr = narrow(x);
            tr.swap_axes(2, 3);
            tr.as_standard_layout().to_owned()
        }
    };
    Backing { data, layout, dims }
}

fn view_of<T: Element>(b: &Backing<T>) -> ArrayView4<'_, T> {
    let d = b.dims;
    match b.layout {
        Layout::Contiguous => b.data.view(),
        Layout::Reversed => {
            let mut v = b.data.view();
            for axis in 0..4 {
                v.invert_axis(Axis(axis));
            }
            v
        }
        Layout::Padded => b
            .data
            .slice(s![1..2 * d[0]; 2, 1..2 * d[1]; 2, 1..2 * d[2]; 2, 1..2 * d[3]; 2]),
        Layout::Broadcast(axis) if d[axis] > 0 => {
            b.data.broadcast(d).expect("length 1 on the axis")
        }
        Layout::Broadcast(_) => b.data.view(),
        Layout::Transposed => {
            let mut v = b.data.view();
            v.swap_axes(2, 3);
            v
        }
    }
}

/// The CPU element types that are also the kernels' (f32, f16) or only the CPU's (bf16).
trait FuzzElement: gqa::cpu::CpuElement {
    fn on_cube(
        env: &Env,
        spec: &AttentionSpec,
        q: ArrayView4<Self>,
        k: ArrayView4<Self>,
        v: ArrayView4<Self>,
    ) -> Option<gqa::Result<HostOutput<Self>>>;
}

impl FuzzElement for f32 {
    fn on_cube(
        env: &Env,
        spec: &AttentionSpec,
        q: ArrayView4<f32>,
        k: ArrayView4<f32>,
        v: ArrayView4<f32>,
    ) -> Option<gqa::Result<HostOutput<f32>>> {
        cube_forward(env, spec, q, k, v)
    }
}
impl FuzzElement for f16 {
    fn on_cube(
        env: &Env,
        spec: &AttentionSpec,
        q: ArrayView4<f16>,
        k: ArrayView4<f16>,
        v: ArrayView4<f16>,
    ) -> Option<gqa::Result<HostOutput<f16>>> {
        cube_forward(env, spec, q, k, v)
    }
}
impl FuzzElement for bf16 {
    fn on_cube(
        _: &Env,
        _: &AttentionSpec,
        _: ArrayView4<bf16>,
        _: ArrayView4<bf16>,
        _: ArrayView4<bf16>,
    ) -> Option<gqa::Result<HostOutput<bf16>>> {
        None
    }
}

fn cube_forward<T: gqa::cube::CubeElement>(
    env: &Env,
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Option<gqa::Result<HostOutput<T>>> {
    let device = env.cube.as_ref()?;
    let config = (spec.q_heads(), spec.kv_heads(), spec.head_dim());
    // Few kernels: these configurations, without softcap or ALiBi.
    if !CUBE_CONFIGS.contains(&config) || spec.softcap().is_some() || spec.alibi().is_some() {
        return None;
    }
    let result = Backend::<T>::try_forward(device, spec, q, k, v);
    if !device.supports(T::DTYPE) {
        // A device without the type (lavapipe has no bf16; a GL device has no f16) must say so.
        // (A problem that is invalid anyway is refused for that first, as the oracle refuses it.)
        match result {
            Err(gqa::Error::UnsupportedDType { dtype, .. }) if dtype == T::DTYPE => return None,
            Ok(_) => panic!("the kernels ran {} on a device without it", T::DTYPE),
            Err(_) => {}
        }
    }
    Some(result)
}

fn check<T: FuzzElement>(
    t: &mut Trace,
    env: &Env,
    spec: &AttentionSpec,
    (q, k, v): (&Array4<f64>, &Array4<f64>, &Array4<f64>),
    layouts: [Layout; 3],
) {
    let (qb, kb, vb) = (
        backing::<T>(q, layouts[0]),
        backing::<T>(k, layouts[1]),
        backing::<T>(v, layouts[2]),
    );
    let (qv, kv, vv) = (view_of(&qb), view_of(&kb), view_of(&vb));
    t.mark(format!(
        "{} {:?}",
        T::DTYPE,
        layouts.map(|l| std::mem::discriminant(&l))
    ));
    let exact = oracle::try_forward(spec, qv, kv, vv);
    let cpu = env.cpu.try_forward(spec, qv, kv, vv);
    let cube = T::on_cube(env, spec, qv, kv, vv);
    match (&exact, &cpu) {
        (Err(a), Err(b)) => {
            assert_eq!(
                crate::variant(a),
                crate::variant(b),
                "the oracle and the CPU refuse differently: {a} / {b}"
            );
            t.mark(crate::variant(a));
            if let Some(Ok(_)) = cube {
                panic!("the kernels accepted what the oracle refused: {a}");
            }
            return;
        }
        (Ok(_), Ok(_)) => {}
        _ => panic!(
            "the oracle and the CPU disagree on validity: {:?} / {:?}",
            exact.as_ref().err(),
            cpu.as_ref().err()
        ),
    }
    let (exact, cpu) = (exact.unwrap(), cpu.unwrap());
    let in_dtype = oracle::try_forward_rounded(spec, qv, kv, vv, T::DTYPE).unwrap();
    let in_f32 = oracle::try_forward_rounded(spec, qv, kv, vv, DType::F32).unwrap();
    let terms = oracle::try_row_terms(spec, qv, kv, vv).unwrap();
    let mut outputs = vec![("cpu", cpu)];
    if let Some(result) = cube {
        outputs.push((
            "cube",
            result.unwrap_or_else(|e| panic!("the kernels refused a valid problem: {e}")),
        ));
        t.mark("cube");
    }
    for (name, out) in outputs {
        assert_eq!(out.o.shape(), exact.o.shape(), "{name}: o's shape");
        let o: Vec<f64> = out.o.iter().map(|x| x.widen()).collect();
        let lse: Vec<f64> = out.lse.iter().map(|&x| f64::from(x)).collect();
        let o_check = compare_rows(
            &exact.o,
            &in_dtype.o,
            &o,
            T::DTYPE,
            spec.head_dim(),
            &terms.outputs(),
        );
        let lse_check = compare_lse(&exact.lse, &in_f32.lse, &lse, &terms.scores);
        assert!(
            o_check.passed(),
            "{name} o: {o_check}\n{spec:?}, layouts {layouts:?}"
        );
        assert!(
            lse_check.passed(),
            "{name} lse: {lse_check}\n{spec:?}, layouts {layouts:?}"
        );
        for (n, &l) in exact.lse.iter().enumerate() {
            if l == f64::NEG_INFINITY {
                let row = &o[n * spec.head_dim()..(n + 1) * spec.head_dim()];
                assert!(
                    row.iter().all(|&x| x == 0.0) && lse[n] == f64::NEG_INFINITY,
                    "{name}: a row that sees nothing is not 0 / −∞"
                );
            }
        }
    }
    t.mark(if exact.lse.iter().any(|&l| l == f64::NEG_INFINITY) {
        "masked rows"
    } else {
        "ok"
    });
}
