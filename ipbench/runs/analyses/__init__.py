"""The paper's analyses as measurements: robustness to masks (Table 4), attentiveness after
re-tokenization (Table 5), similarity of merged pairs (Tables 6, 8), importance of merged tokens
(Table 7) and the local-coherence ablation (Table 8). One module per command, shared plumbing in
`common`, the pure mask function in `masking`; the trace analyses themselves live in
`ipbench.reducers.trace`.
"""
