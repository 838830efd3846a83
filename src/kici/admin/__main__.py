from kici.admin.main import main

main()
