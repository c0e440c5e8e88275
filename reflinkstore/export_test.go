package reflinkstore

// StopSpareWorker stops s's spare worker without unmounting anything, as a kill -9 of the plugin
// would: tests that open a second store on the same root use it on the first.
func StopSpareWorker(s *Store) { s.stopSpares() }
