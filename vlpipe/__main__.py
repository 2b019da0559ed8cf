"""`python -m vlpipe` (and `torchrun -m vlpipe`) run the command line."""

from vlpipe.pipelines.cli import main

main()
