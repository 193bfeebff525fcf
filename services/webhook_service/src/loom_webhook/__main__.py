from loom_webhook.serve import main

main()
