//! Property tests of the initializers: values do not depend on how a tensor is cut up.

use gradflow_core::Initializer;
use proptest::prelude::*;

fn initializer() -> impl Strategy<Value = Initializer> {
    prop_oneof![
        Just(Initializer::Zeros),
        (-10.0f32..10.0).prop_map(|value| Initializer::Constant { value }),
        (-5.0f32..0.0, 0.001f32..5.0, any::<u64>())
            .prop_map(|(low, w, seed)| { Initializer::Uniform { low, high: low + w, seed } }),
        (-5.0f32..5.0, 0.0f32..3.0, any::<u64>()).prop_map(|(mean, std, seed)| Initializer::Normal {
            mean,
            std,
            seed
        }),
        (0.1f32..3.0, any::<u64>()).prop_map(|(gain, seed)| Initializer::XavierUniform { gain, seed }),
        (0.1f32..3.0, any::<u64>()).prop_map(|(gain, seed)| Initializer::XavierNormal { gain, seed }),
    ]
}

proptest! {
    #[test]
    fn filling_in_pieces_equals_filling_at_once(
        init in initializer(),
        shape in prop::collection::vec(1u64..=30, 0..=3),
        cuts in prop::collection::vec(0.0f64..1.0, 0..6),
        name in "[a-z/_0-9]{1,12}",
    ) {
        prop_assert!(init.validate(&name).is_ok());
        let numel: u64 = shape.iter().product();
        let mut whole = vec![f32::NAN; numel as usize];
        init.fill_dense(&name, &shape, 0, &mut whole);
        prop_assert!(whole.iter().all(|x| x.is_finite()));

        let mut bounds: Vec<u64> = cuts.iter().map(|c| (c * numel as f64) as u64).collect();
        bounds.push(0);
        bounds.push(numel);
        bounds.sort_unstable();
        let mut pieced = vec![f32::NAN; numel as usize];
        for w in bounds.windows(2) {
            init.fill_dense(&name, &shape, w[0], &mut pieced[w[0] as usize..w[1] as usize]);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&whole), bits(&pieced));
    }

    #[test]
    fn rows_depend_only_on_name_id_and_column(
        init in initializer(),
        id in any::<u64>(),
        dim in 1usize..64,
    ) {
        let mut a = vec![0.0f32; dim];
        let mut b = vec![1.0f32; dim];
        init.fill_row("emb", id, &mut a);
        init.fill_row("emb", id, &mut b);
        prop_assert_eq!(&a, &b);
        prop_assert!(a.iter().all(|x| x.is_finite()));
    }
}
