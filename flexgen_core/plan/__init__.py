"""Choosing a policy (FlexGen paper, Sec. 4.3): hardware profiles (`hardware`, data only), the profiler
that measures one (`profiler`, also where the profile to plan with is resolved), the cost model that
follows the engine's schedule (`cost_model`), the policy search (`search`, cvxpy) and model shapes for
planning (`shapes`). Nothing here needs torch except the profiler.
"""
