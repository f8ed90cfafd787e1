"""DPO recovers the closed-form optimum π* = π_ref·exp(r/β)/Z (a few seconds on a CPU).

    python examples/closed_form.py

For one prompt with four responses, a reward r and several references π_ref and β, it minimises the
expected DPO loss (Bradley–Terry labels from r, every pair drawn uniformly) over a tabular softmax
policy and prints π_ref, π*, the learned π and their total-variation distance. Large β keeps π near
π_ref; small β puts nearly all mass on the best response. See dpolab/theory.py for the derivation.
"""

from dpolab.theory import fit_tabular_policy, optimal_policy, total_variation

REWARDS = [1.0, 0.0, -0.5, 2.0]
REFERENCES = {
    "uniform": [0.25, 0.25, 0.25, 0.25],
    "skewed": [0.6, 0.25, 0.1, 0.05],
}
BETAS = [0.1, 1.0, 10.0]


def main() -> None:
    print("rewards r = " + ", ".join(f"{r:+.1f}" for r in REWARDS))
    for ref_name, ref in REFERENCES.items():
        for beta in BETAS:
            target = optimal_policy(ref, REWARDS, beta)
            learned = fit_tabular_policy(ref, REWARDS, beta)
            print(f"\nπ_ref {ref_name}, β = {beta:g}")
            print(f"  {'y':>2} {'r':>5} {'π_ref':>8} {'π*':>8} {'learned':>8}")
            for y, (r, p_ref, p_star, p) in enumerate(zip(REWARDS, ref, target.tolist(), learned.tolist())):
                print(f"  {y:>2} {r:>+5.1f} {p_ref:>8.4f} {p_star:>8.4f} {p:>8.4f}")
            print(f"  TV(learned, π*) = {total_variation(learned, target):.1e}   "
                  f"TV(learned, π_ref) = {total_variation(learned, ref):.3f}")


if __name__ == "__main__":
    main()
