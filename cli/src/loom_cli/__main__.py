from loom_cli.main import main

main()
