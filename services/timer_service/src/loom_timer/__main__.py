from loom_timer.serve import main

main()
