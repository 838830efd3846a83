from kici.agent.main import main

main()
