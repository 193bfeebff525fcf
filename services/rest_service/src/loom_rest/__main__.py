from loom_rest.serve import main

main()
