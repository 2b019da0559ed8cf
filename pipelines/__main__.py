from vlpipe.pipelines.cli import main

main()
