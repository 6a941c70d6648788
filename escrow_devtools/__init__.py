"""Development tooling for x402-escrow, kept out of the runtime package `escrow_py`.

    anvil        a local anvil chain (the binary from the checkout's node_modules)
    build        the compiler driver: contracts/ -> the shipped and the test artifacts
    artifacts    the test and hostile tokens, test helpers and Circle's FiatToken baseline
    fiat_token   Circle's USDC deployed on a local chain as Circle deploys it
    bench        `x402-escrow bench gas|http|keeper|scale|storage` (and a throwaway PostgreSQL: bench.postgres)
    demo         `x402-escrow demo`

`escrow_py` never imports this package (a test checks it), except the CLI, lazily, when the
`demo`, `bench` or `contracts build` subcommand runs.
"""
