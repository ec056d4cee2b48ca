"""Entry points above everything: the ``live-avatar`` command (serve, render, client, bench, train-tiny), the test
client and recorder, the benchmarks and the server subprocess helper."""
