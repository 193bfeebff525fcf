from loom_websocket.serve import main

main()
