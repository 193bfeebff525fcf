from loom_worker.serve import main

main()
